"""Signed events: every emitter signs what it emits, every consumer checks before it acts.

Who signs is a *principal*: one function in one cloud (`aws/scheduler`), or `cli` for people
publishing with the `skyfuse` command. Each has its own Ed25519 key pair, so a compromised
inference function can sign only as itself, and `events/catalog.toml` says which principals may
emit each type (`contracts.producer_error`).

What is signed: the CloudEvent's id, source, type, time and subject, and the sha256 of its data
as canonical JSON (sorted keys), as one JSON array, so no two events share signed bytes. Two
extension attributes carry the result: `signaturekeyid` (the key, so keys can be rotated) and
`signature` (base64url). The signer's source must be its own (`skyfuse://aws/scheduler`), and
its signed time recent (`signing.max_age_s`): an old event replayed later is refused.

Keys live in `signing.keys_dir`: `trust.json` lists every trusted public key with its principal
(public: ship it with every function); `private/<principal>.pem` holds the private keys of a local
fleet (mode 0600). In a cloud a function gets its own private key from `SKYFUSE_SIGNING_KEY` (PEM),
set from the cloud's secret store. `skyfuse keys` makes, rotates and retires keys.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import orjson
from cloudevents.http import CloudEvent
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from skyfuse import files
from skyfuse.errors import Failure, SkyfuseError

if TYPE_CHECKING:
    from skyfuse.config import Fleet

SIGNATURE, KEY_ID = "signature", "signaturekeyid"  # CloudEvents extension attributes
CLI = "cli"
ENV_KEY = "SKYFUSE_SIGNING_KEY"


class Untrusted(SkyfuseError):
    """An event that is not signed by a trusted, allowed producer; the message says why."""


class KeySetupError(Failure, RuntimeError):
    """Keys missing or unusable; the message says which and what to run."""


class TrustEntry(TypedDict):
    """One trusted public key in `trust.json`."""

    id: str
    principal: str
    ed25519: str  # the raw public key, base64url


def principal(cloud: str, function: str) -> str:
    return f"{cloud}/{function}"


def source_of(who: str) -> str:
    """The CloudEvent source a principal signs as."""
    return f"skyfuse://{who}"


def signed_bytes(event: CloudEvent) -> bytes:
    data = orjson.dumps(event.get_data(), option=orjson.OPT_SORT_KEYS)
    return orjson.dumps(["skyfuse-event-v1", event["id"], event["source"], event["type"], event.get("time"),
                         event.get("subject"), hashlib.sha256(data).hexdigest()])


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(who: str, public: Ed25519PublicKey) -> str:
    """`aws.scheduler.<12 hex of the key's fingerprint>`: names the principal and the key."""
    return f"{who.replace('/', '.')}.{hashlib.sha256(_public_raw(public)).hexdigest()[:12]}"


@dataclass(frozen=True)
class Signer:
    who: str
    key: Ed25519PrivateKey
    id: str

    def sign(self, event: CloudEvent) -> CloudEvent:
        event[KEY_ID] = self.id
        event[SIGNATURE] = _b64(self.key.sign(signed_bytes(event)))
        return event


@dataclass(frozen=True)
class TrustedKey:
    id: str
    who: str
    key: Ed25519PublicKey


class Keyring:
    """The trusted public keys of `keys_dir/trust.json`."""

    def __init__(self, keys: dict[str, TrustedKey], path: Path):
        self.keys, self.path = keys, path

    def verify(self, event: CloudEvent, *, max_age_s: float, max_skew_s: float, now: float | None = None) -> str:
        """The principal that signed `event`; raises `Untrusted` with the reason if none did."""
        kid, signature = event.get(KEY_ID), event.get(SIGNATURE)
        if not kid or not signature:
            raise Untrusted("unsigned: no signature/signaturekeyid attributes; with signing on, every event must "
                            "be signed by its producer's key")
        trusted = self.keys.get(str(kid))
        if trusted is None:
            raise Untrusted(f"signed with key {str(kid)[:80]!r}, which {self.path} does not list (unknown or retired)")
        try:
            trusted.key.verify(_unb64(str(signature)), signed_bytes(event))
        except (InvalidSignature, ValueError):
            raise Untrusted(f"bad signature for key {trusted.id}: the event was altered or forged") from None
        if event["source"] != source_of(trusted.who):
            raise Untrusted(f"source {event['source'][:80]!r} is not its signer's ({source_of(trusted.who)})")
        try:
            signed_at = datetime.fromisoformat(str(event.get("time"))).timestamp()
        except ValueError:
            raise Untrusted(f"time {str(event.get('time'))[:40]!r} is not an RFC 3339 timestamp") from None
        age = (time.time() if now is None else now) - signed_at
        if age > max_age_s:
            raise Untrusted(f"signed at {event['time']}, {age:.0f} s ago, longer than "
                            f"signing.max_age_s={max_age_s:.0f}: refused as a replay")
        if -age > max_skew_s:
            raise Untrusted(f"signed at {event['time']}, {-age:.0f} s in the future, more than "
                            f"signing.max_skew_s={max_skew_s:.0f}")
        return trusted.who


# -- for a fleet (its `signing` settings) ---------------------------------------------------------

def signer_for(fleet: Fleet, who: str) -> Signer | None:
    """`who`'s signer under the fleet's settings; None with signing off."""
    return load_signer(fleet.signing.keys_dir, who) if fleet.signing.enabled else None


def check(fleet: Fleet, event: CloudEvent) -> str | None:
    """The verified signer of `event`, allowed by the catalog to emit it (None with signing off);
    raises `Untrusted` with the reason otherwise."""
    from skyfuse import contracts

    settings = fleet.signing
    if not settings.enabled:
        return None
    who = keyring(settings.keys_dir).verify(event, max_age_s=settings.max_age_s, max_skew_s=settings.max_skew_s)
    refusal = contracts.producer_error(event["type"], who, event.get_data(),
                                       fleet.control_cloud or next(iter(fleet.clouds)))
    if refusal:
        raise Untrusted(refusal)
    return who


def fleet_principals(fleet: Fleet) -> list[str]:
    """Every principal of a fleet: each function in each of its clouds, and the CLI."""
    from skyfuse.config import FUNCTIONS

    return [principal(c, f) for f in FUNCTIONS for c in fleet.clouds_for(f)] + [CLI]


def ensure_local_keys(fleet: Fleet) -> list[str]:
    """A local fleet's keys, made where missing (what `skyfuse up`, `demo` and `keys init` do)."""
    return init_keys(fleet.signing.keys_dir, fleet_principals(fleet)) if fleet.signing.enabled else []


# -- the keys folder ---------------------------------------------------------------------------

def _trust_path(keys_dir: str | os.PathLike[str]) -> Path:
    return Path(keys_dir) / "trust.json"


def _private_path(keys_dir: str | os.PathLike[str], who: str) -> Path:
    return Path(keys_dir) / "private" / f"{who.replace('/', '.')}.pem"


def _read_trust(path: Path) -> list[TrustEntry]:
    try:
        entries: list[TrustEntry] = orjson.loads(path.read_bytes())["keys"]  # as `_save_trust` wrote them
        return entries
    except FileNotFoundError:
        return []
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise KeySetupError(f"{path}: not a skyfuse trust file ({exc}); remove it and run "
                            "`skyfuse keys init`") from None


_keyrings: dict[Path, tuple[int, Keyring]] = {}


def keyring(keys_dir: str | os.PathLike[str]) -> Keyring:
    """The trust file of `keys_dir`, read again whenever it changes (keys rotate under running hosts)."""
    path = _trust_path(keys_dir).resolve()
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise KeySetupError(f"no trust file at {path}: run `skyfuse keys init` (make run and make test do), "
                        "or set signing.enabled = false") from None
    cached = _keyrings.get(path)
    if cached and cached[0] == stamp:
        return cached[1]
    keys: dict[str, TrustedKey] = {}
    for entry in _read_trust(path):
        public = Ed25519PublicKey.from_public_bytes(_unb64(entry["ed25519"]))
        keys[entry["id"]] = TrustedKey(entry["id"], entry["principal"], public)
    ring = Keyring(keys, path)
    _keyrings[path] = (stamp, ring)
    return ring


def load_signer(keys_dir: str | os.PathLike[str], who: str, environ: Mapping[str, str] | None = None) -> Signer:
    """The signer of `who`: from SKYFUSE_SIGNING_KEY_<FUNCTION> (an Azure function app, whose functions
    share one environment) or SKYFUSE_SIGNING_KEY (a function of its own), set from the cloud's secret
    store; else `private/<who>.pem` (a local fleet)."""
    env = os.environ if environ is None else environ
    path = _private_path(keys_dir, who)
    variable = next((n for n in (f"{ENV_KEY}_{who.rpartition('/')[2].upper()}", ENV_KEY) if env.get(n)), None)
    try:
        pem = env[variable].encode() if variable else path.read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
    except FileNotFoundError:
        raise KeySetupError(f"signing is on but {who} has no key: none at {path} and {ENV_KEY} is unset; run "
                        "`skyfuse keys init` (a local fleet), set it from the cloud's secret store, or set "
                        "signing.enabled = false") from None
    except ValueError as exc:
        raise KeySetupError(f"the signing key of {who} ({variable or path}) is not a PEM "
                        f"private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeySetupError(f"the signing key of {who} is a {type(key).__name__}; skyfuse signs with Ed25519 keys")
    signer = Signer(who, key, key_id(who, key.public_key()))
    if signer.id not in keyring(keys_dir).keys:
        raise KeySetupError(f"the signing key of {who} ({signer.id}) is not in {_trust_path(keys_dir)}: every "
                            "consumer would refuse its events; add it (`skyfuse keys init` locally) or fix the key")
    return signer


@contextlib.contextmanager
def _locked(keys_dir: Path) -> Iterator[None]:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(keys_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_secret(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Write a private file (0600, its folder 0700), all at once; with `replace=False`, only if there
    is none yet. True if this call wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not replace:
        return files.create_if_absent(path, data, 0o600)
    files.write_atomic(path, data, 0o600)
    return True


def _new_key(keys_dir: Path, who: str, trust: list[TrustEntry]) -> TrustEntry:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_secret(_private_path(keys_dir, who), pem)
    entry: TrustEntry = {"id": key_id(who, key.public_key()), "principal": who,
                         "ed25519": _b64(_public_raw(key.public_key()))}
    trust.append(entry)
    return entry


def _save_trust(keys_dir: Path, trust: list[TrustEntry]) -> None:
    files.write_atomic(_trust_path(keys_dir), orjson.dumps({"keys": trust}, option=orjson.OPT_INDENT_2), 0o644)


def init_keys(keys_dir: str | os.PathLike[str], principals: Iterable[str]) -> list[str]:
    """Make a key pair for every principal that has no private key here; returns the new key ids."""
    folder = Path(keys_dir)
    with _locked(folder):
        trust = _read_trust(_trust_path(folder))
        made = [_new_key(folder, who, trust)["id"] for who in dict.fromkeys(principals)
                if not _private_path(folder, who).exists()]
        if made or not _trust_path(folder).exists():
            _save_trust(folder, trust)
    return made


def rotate(keys_dir: str | os.PathLike[str], who: str) -> str:
    """A new key for `who`: it signs from now on; its old keys stay trusted until `retire`d."""
    folder = Path(keys_dir)
    with _locked(folder):
        trust = _read_trust(_trust_path(folder))
        entry = _new_key(folder, who, trust)
        _save_trust(folder, trust)
    return entry["id"]


def retire(keys_dir: str | os.PathLike[str], kid: str) -> None:
    """Stop trusting key `kid` (after signing.max_age_s, nothing on the bus is signed with it any more)."""
    folder = Path(keys_dir)
    with _locked(folder):
        trust = _read_trust(_trust_path(folder))
        kept = [e for e in trust if e["id"] != kid]
        if len(kept) == len(trust):
            raise KeySetupError(f"no key {kid!r} in {_trust_path(folder)}; `skyfuse keys list` shows them")
        _save_trust(folder, kept)


def trusted(keys_dir: str | os.PathLike[str]) -> list[TrustEntry]:
    """The trust file's entries (id, principal, ed25519)."""
    return _read_trust(_trust_path(keys_dir))
