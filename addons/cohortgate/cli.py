"""The `cohortgate` command line: serve, keys, token, revoke, check, audit, demo.

Exit codes: 0 success (for `token inspect`: the config allows the token), 1 a negative result
(`token inspect` denies, `audit verify` finds a break, `check` finds an error), 2 bad usage or
an unreadable config. Errors are one line naming the file, the key and the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cohortgate import __version__
from cohortgate.config import ASYMMETRIC_ALGORITHMS
from cohortgate.config import Config
from cohortgate.config import ConfigError
from cohortgate.config import describe
from cohortgate.config import load_config
from cohortgate.tail import add_parsers as add_tail_parsers
from cohortgate.units import parse_duration

DEFAULT_CONFIG = "config/cohortgate.toml"
ALGORITHMS = sorted(ASYMMETRIC_ALGORITHMS)
EXIT_OK, EXIT_NEGATIVE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the command line or an unreadable file: exit 2 with this message."""


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"cohortgate: {message}", file=sys.stderr)
    return code


def _config(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        raise UsageError(str(e)) from e


# ---- serve -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from cohortgate.runtime import Runtime
    from cohortgate.server import run
    from cohortgate.server import setup_logging

    setup_logging()
    try:
        runtime = Runtime.start(Path(args.config), upstream=args.upstream, listen=args.listen)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    from mitmproxy.exceptions import OptionsError

    try:
        return asyncio.run(run(runtime))
    except (ValueError, OptionsError) as e:  # e.g. an unreadable TLS certificate
        raise UsageError(str(e)) from e
    finally:
        runtime.close()


# ---- keys ------------------------------------------------------------------------------


def cmd_keys_init(args: argparse.Namespace) -> int:
    from cohortgate.keys import init_keys

    try:
        pem, jwks = init_keys(Path(args.dir), args.alg, args.kid)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(f"private key: {pem} (mode 0600; keep it offline, never commit it)")
    print(f"trust store: {jwks} (give this to every proxy as authority.jwks)")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from cohortgate.keys import rotate_keys

    try:
        pem, jwks = rotate_keys(Path(args.dir), args.alg, args.kid)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(f"new private key: {pem} (mode 0600)")
    print(f"trust store: {jwks} (the old public keys stay until you remove them)")
    return EXIT_OK


# ---- token -----------------------------------------------------------------------------


def cmd_token_issue(args: argparse.Namespace) -> int:
    from cohortgate.keys import issue_token

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as e:
        raise UsageError(f"--ttl: {e}") from e
    for name in ("rpm", "tpm"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name}: must be a positive integer")
    try:
        token = issue_token(
            Path(args.key),
            issuer=args.issuer,
            audience=args.audience,
            customer=args.customer,
            cohort=args.cohort,
            ttl=ttl,
            rpm=args.rpm,
            tpm=args.tpm,
            models=args.model or (),
            bind_api_key=args.bind_api_key,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(token)
    return EXIT_OK


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded))


def inspect_verdict(token: str, cfg: Config, now: float) -> tuple[str, str, str]:
    """(decision, reason, message) that `cfg` gives `token` now, the request aside."""
    from cohortgate.keys import load_trust_store
    from cohortgate.policy import admit_cohort
    from cohortgate.policy import check_revocation
    from cohortgate.policy import load_revocations
    from cohortgate.reasons import Denial
    from cohortgate.verify import Verifier

    try:
        store = load_trust_store(cfg.authority.jwks)
        revocations = load_revocations(cfg.revocation.file)
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        approval = Verifier(cfg.authority, store).verify(token.strip(), now)
        check_revocation(approval, revocations)
        admit_cohort(cfg.phase_at(now), approval)
    except Denial as d:
        return "deny", d.code, d.public_message()
    note = " (bound to an API key: the request must carry it)" if approval.api_key_sha256 else ""
    return "allow", "approved", f"customer {approval.sub!r}, cohort {approval.cohort!r}{note}"


def cmd_token_inspect(args: argparse.Namespace) -> int:
    token: str = sys.stdin.read() if args.token == "-" else args.token  # noqa: S105 ("-": stdin)
    token = token.strip()
    if token.lower().startswith("bearer "):
        token = token.removeprefix(token[:7]).strip()
    parts = token.split(".")
    try:
        header, claims = _b64json(parts[0]), _b64json(parts[1])
    except (ValueError, IndexError):
        print("token: not a readable JWT (three base64url JSON segments expected)")
        header = claims = None
    if header is not None:
        print("header: " + json.dumps(header, sort_keys=True))
        print("claims: " + json.dumps(claims, indent=2, sort_keys=True))
        for name in ("iat", "nbf", "exp"):
            if isinstance(claims, dict) and isinstance(claims.get(name), int):
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims[name]))
                print(f"{name}: {stamp}")
    if args.config is None and not Path(DEFAULT_CONFIG).exists():
        print("verdict: not checked (no --config given)")
        return EXIT_OK if header is not None else EXIT_NEGATIVE
    decision, reason, message = inspect_verdict(token, _config(args.config or DEFAULT_CONFIG),
                                                time.time())
    print(f"verdict: {decision} {reason}: {message}")
    return EXIT_OK if decision == "allow" else EXIT_NEGATIVE


# ---- revoke, check, audit ----------------------------------------------------------------


def cmd_revoke(args: argparse.Namespace) -> int:
    from cohortgate.policy import add_revocation
    from cohortgate.policy import rfc3339_utc

    cfg = _config(args.config)
    path = cfg.revocation.file
    at = rfc3339_utc()
    try:
        added = add_revocation(path, jti=args.jti, customer=args.customer, reason=args.reason,
                               at=at)
    except (ValueError, OSError) as e:
        raise UsageError(f"{path}: {e}") from e
    what = f"jti {args.jti}" if args.jti is not None else f"customer {args.customer!r}"
    print(f"{what}: {'revoked' if added else 'already revoked'} in {path}")
    if cfg.ratelimit.backend == "memory":
        return EXIT_OK
    from cohortgate.revocation_sync import publish_revocation

    try:
        shared = asyncio.run(publish_revocation(cfg.ratelimit.backend, jti=args.jti,
                                                customer=args.customer, reason=args.reason,
                                                at=at))
    except Exception as e:  # the file has it; say plainly that the replicas may not yet
        print(f"cohortgate: the revocation file has it, but Redis could not be reached: {e}; "
              "replicas that do not read this file will not see it until Redis has it "
              "(run the command again)", file=sys.stderr)
        return EXIT_NEGATIVE
    print(f"{what}: {'published' if shared else 'already'} in Redis: every replica applies it "
          "within a second")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from cohortgate.keys import load_trust_store
    from cohortgate.policy import load_revocations

    cfg = _config(args.config)
    print(describe(cfg))
    problems = []
    try:
        store = load_trust_store(cfg.authority.jwks)
        print(f"trust store: {len(store.keys)} key(s): {', '.join(sorted(store.keys))}")
        for why in store.skipped:
            print(f"  skipped: {why}")
    except ValueError as e:
        problems.append(str(e))
    try:
        revoked = load_revocations(cfg.revocation.file)
        print(f"revocations: {len(revoked.jti)} token(s), {len(revoked.customers)} customer(s)")
    except ValueError as e:
        problems.append(str(e))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_NEGATIVE if problems else EXIT_OK


def _recorded_head(path: Path) -> tuple[int, str]:
    """The newest head in a file written by `audit head --append`."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        head = json.loads(lines[-1])
        seq, digest = head["seq"], head["hash"]
    except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a file of recorded heads ({e})") from e
    if not isinstance(seq, int) or not isinstance(digest, str):
        raise UsageError(f"{path}: the last recorded head has no integer seq and hash")
    return seq, digest


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from cohortgate.audit import verify_chain

    paths = [Path(p) for p in args.files]
    for p in paths:
        if not p.is_file():
            raise UsageError(f"{p}: no such file")
    expect = _recorded_head(Path(args.heads)) if args.heads else None
    result = verify_chain(paths, expect_head=expect)
    for note in result.notes:
        print(f"note: {note}")
    if result.breaks is not None:
        b = result.breaks
        print(f"BROKEN: {b.file}:{b.line} (seq {b.seq}): {b.why}")
        return EXIT_NEGATIVE
    print(f"ok: {result.lines} lines, seq {result.first_seq}..{result.last_seq}, "
          f"head {result.last_hash}" + (f"; recorded head seq {expect[0]} found" if expect else ""))
    return EXIT_OK


def cmd_audit_head(args: argparse.Namespace) -> int:
    import urllib.request

    if args.url:
        url = args.url.rstrip("/")
    else:
        host, port = _config(args.config).admin_listen
        url = f"http://{host}:{port}"
    try:
        with urllib.request.urlopen(f"{url}/audit/head", timeout=5) as resp:  # noqa: S310
            head = json.loads(resp.read())
    except (OSError, ValueError) as e:
        raise UsageError(f"{url}/audit/head: {e}") from e
    head["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = json.dumps(head, sort_keys=True)
    print(line)
    if args.append:
        with open(args.append, "a") as f:
            f.write(line + "\n")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from cohortgate.demo import main as demo_main

    return demo_main(keep_serving=not args.no_serve, port=args.port)


# ---- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cohortgate", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"cohortgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gate in front of the upstream")
    s.add_argument("--config", default=DEFAULT_CONFIG)
    s.add_argument("--listen", help="host:port, instead of the config's `listen`")
    s.add_argument("--upstream", help="URL, instead of the config's `upstream`")
    s.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="the authority's signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = ksub.add_parser("init", help="first signing key + jwks.json")
    k.add_argument("--dir", default="keys")
    k.add_argument("--alg", default="EdDSA", choices=ALGORITHMS)
    k.add_argument("--kid")
    k.set_defaults(func=cmd_keys_init)
    k = ksub.add_parser("rotate", help="a new signing key; old public keys stay trusted")
    k.add_argument("--dir", default="keys")
    k.add_argument("--alg", choices=ALGORITHMS)
    k.add_argument("--kid")
    k.set_defaults(func=cmd_keys_rotate)

    token = sub.add_parser("token", help="issue and inspect approval tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("issue", help="sign an approval for one customer")
    t.add_argument("--key", required=True, help="the private key file (keys/<kid>.pem)")
    t.add_argument("--issuer", required=True)
    t.add_argument("--audience", required=True)
    t.add_argument("--customer", required=True)
    t.add_argument("--cohort", required=True)
    t.add_argument("--ttl", default="14d")
    t.add_argument("--rpm", type=int)
    t.add_argument("--tpm", type=int)
    t.add_argument("--model", action="append", help="a model this approval covers (repeatable)")
    t.add_argument("--bind-api-key", help="bind the approval to this API key (cnf)")
    t.set_defaults(func=cmd_token_issue)
    t = tsub.add_parser("inspect", help="show a token's claims and this config's verdict")
    t.add_argument("token", help="the JWT, or - to read it from standard input")
    t.add_argument("--config")
    t.set_defaults(func=cmd_token_inspect)

    r = sub.add_parser("revoke", help="revoke a token (--jti) or a customer")
    group = r.add_mutually_exclusive_group(required=True)
    group.add_argument("--jti")
    group.add_argument("--customer")
    r.add_argument("--config", default=DEFAULT_CONFIG)
    r.add_argument("--reason", default="revoked by the authority")
    r.set_defaults(func=cmd_revoke)

    c = sub.add_parser("check", help="validate the config and keys; print the effective policy")
    c.add_argument("--config", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_check)

    audit = sub.add_parser("audit", help="the decision log's hash chain")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    a = asub.add_parser("verify", help="check the chain across rotated files")
    a.add_argument("files", nargs="+")
    a.add_argument("--heads", help="a file of heads recorded by `audit head --append`: the "
                                   "newest must be in the chain (catches lines cut from the end)")
    a.set_defaults(func=cmd_audit_verify)
    a = asub.add_parser("head", help="fetch a running gate's chain head (/audit/head)")
    where = a.add_mutually_exclusive_group()
    where.add_argument("--config", default=DEFAULT_CONFIG, help="find the admin address here")
    where.add_argument("--url", help="the admin listener, e.g. http://127.0.0.1:9090")
    a.add_argument("--append", help="append the head to this file (run it from cron)")
    a.set_defaults(func=cmd_audit_head)

    d = sub.add_parser("demo", help="throwaway keys, a stand-in upstream, the gate, three calls")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--no-serve", action="store_true", help="exit after the three calls")
    d.set_defaults(func=cmd_demo)

    add_tail_parsers(sub)  # tail, report
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except UsageError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
