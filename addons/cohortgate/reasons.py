"""Every reason code once: its HTTP status, its OpenAI error type and its message.

A refusal anywhere in the gate is raised as a subclass of `Denial`; callers branch on the
class, never on text. The HTTP layer turns a Denial into an OpenAI-shaped JSON error with
`error_body()`.

    Denial
    ├── InvalidRequest (400) ── DuplicateJsonMember (400)
    ├── BodyTooLarge (413)
    ├── TokenTooLarge (431), HeadersTooLarge (431)
    ├── Unauthenticated (401): MissingToken, MalformedToken, AlgorithmNotAllowed, UnknownKey,
    │       InvalidSignature, TokenExpired, TokenNotYetValid, InvalidIssuer, InvalidAudience,
    │       MissingClaim, InvalidClaim, LifetimeTooLong, TokenRevoked
    ├── Forbidden (403): CohortNotAdmitted, CustomerRevoked, ModelNotApproved, BindingMismatch
    ├── RateLimited (429): RateLimitedRequests, RateLimitedTokens
    ├── InternalError (500)
    ├── UpstreamUnavailable (502)
    └── Unavailable (503): KeysUnavailable, RatelimitUnavailable, AuditUnavailable
"""

from __future__ import annotations

import json
from typing import ClassVar

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
}


class Denial(Exception):
    """A request the gate refuses. `detail` is for operators (log, CLI), never secret."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    message: ClassVar[str] = "The gateway failed to process the request."

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.message)
        self.detail = detail

    @property
    def error_type(self) -> str:
        return ERROR_TYPES[self.status]

    @property
    def retryable(self) -> bool:
        """Whether the openai SDK may retry: only rate limits and temporary unavailability."""
        return self.status in (429, 503)

    def public_message(self) -> str:
        """The message a client sees: the class message, plus the detail where it is safe."""
        return f"{self.message} ({self.detail})" if self.detail else self.message


def error_body(code: str, status: int, message: str) -> bytes:
    """The OpenAI error shape, so the `openai` SDK raises the matching exception."""
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": ERROR_TYPES.get(status, "server_error"),
                "code": code,
                "param": None,
            }
        },
        separators=(",", ":"),
    ).encode()


class InvalidRequest(Denial):
    code = "invalid_request"
    status = 400
    message = "The request is malformed."


class DuplicateJsonMember(InvalidRequest):
    message = "The JSON body repeats a member name."


class BodyTooLarge(Denial):
    code = "body_too_large"
    status = 413
    message = "The request body exceeds the gateway's size limit."


class TokenTooLarge(Denial):
    code = "token_too_large"
    status = 431
    message = "The approval token exceeds the size limit."


class HeadersTooLarge(Denial):
    code = "headers_too_large"
    status = 431
    message = "The request headers exceed the gateway's size limit."


class Unauthenticated(Denial):
    status = 401


class MissingToken(Unauthenticated):
    code = "missing_token"
    message = "No approval token was sent."


class MalformedToken(Unauthenticated):
    code = "malformed_token"
    message = "The approval token is not a well-formed JWT."


class AlgorithmNotAllowed(Unauthenticated):
    code = "algorithm_not_allowed"
    message = "The approval token's signing algorithm is not allowed."


class UnknownKey(Unauthenticated):
    code = "unknown_key"
    message = "The approval token names no key in the trust store."


class InvalidSignature(Unauthenticated):
    code = "invalid_signature"
    message = "The approval token's signature does not verify."


class TokenExpired(Unauthenticated):
    code = "token_expired"
    message = "The approval token has expired."


class TokenNotYetValid(Unauthenticated):
    code = "token_not_yet_valid"
    message = "The approval token is not valid yet."


class InvalidIssuer(Unauthenticated):
    code = "invalid_issuer"
    message = "The approval token was not issued by the configured authority."


class InvalidAudience(Unauthenticated):
    code = "invalid_audience"
    message = "The approval token is not for this service."


class MissingClaim(Unauthenticated):
    code = "missing_claim"
    message = "The approval token lacks a required claim."


class InvalidClaim(Unauthenticated):
    code = "invalid_claim"
    message = "The approval token has a claim of the wrong type or value."


class LifetimeTooLong(Unauthenticated):
    code = "lifetime_too_long"
    message = "The approval token's lifetime exceeds the allowed maximum."


class TokenRevoked(Unauthenticated):
    code = "token_revoked"
    message = "The approval token has been revoked."


class Forbidden(Denial):
    status = 403


class CohortNotAdmitted(Forbidden):
    code = "cohort_not_admitted"
    message = "The approval's cohort is not admitted in the current release phase."


class CustomerRevoked(Forbidden):
    code = "customer_revoked"
    message = "The customer's approval has been revoked."


class ModelNotApproved(Forbidden):
    code = "model_not_approved"
    message = "The approval does not cover the requested model."


class BindingMismatch(Forbidden):
    code = "binding_mismatch"
    message = "The approval token is bound to a different API key."


class RateLimited(Denial):
    status = 429


class RateLimitedRequests(RateLimited):
    code = "rate_limited_requests"
    message = "Rate limit reached for requests per minute."


class RateLimitedTokens(RateLimited):
    code = "rate_limited_tokens"
    message = "Rate limit reached for tokens per minute."


class InternalError(Denial):
    pass


class UpstreamUnavailable(Denial):
    code = "upstream_unavailable"
    status = 502
    message = "The inference service is unavailable."


class Unavailable(Denial):
    status = 503


class KeysUnavailable(Unavailable):
    code = "keys_unavailable"
    message = "The gateway has no trust store loaded."


class RatelimitUnavailable(Unavailable):
    code = "ratelimit_unavailable"
    message = "The rate limiter is unavailable."


class AuditUnavailable(Unavailable):
    code = "audit_unavailable"
    message = "The gateway cannot record decisions now, so it serves none."


def all_denials() -> list[type[Denial]]:
    """Every concrete reason, for tests and documentation."""
    found: list[type[Denial]] = []
    stack: list[type[Denial]] = [Denial]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls is not Denial and ("code" in vars(cls) or cls is InternalError):
            found.append(cls)
    return found
