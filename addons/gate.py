"""Entry for `mitmdump -s addons/gate.py --set cohortgate_config=config/cohortgate.toml`.

Runs the same addon inside a stock mitmproxy, for debugging with mitmproxy's own tools.
Production runs `cohortgate serve`: mitmproxy unloads a script that fails to reload, and then
forwards unauthenticated requests.
"""

import sys
from pathlib import Path

# so that a checkout works without `pip install`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cohortgate.addon import CohortGate

addons = [CohortGate()]
