"""cohortgate: a staged-release approval gate for OpenAI-compatible inference APIs."""

__version__ = "0.1.0"
