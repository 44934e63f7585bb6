"""stub"""
from typing import Any


def run(**kw: Any) -> dict[str, Any]:
    return {}
