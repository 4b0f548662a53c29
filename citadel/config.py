"""Settings: the one place that reads the environment and ``.env``.

Every variable of the contract is a field here, read under its exact name
(``CITADEL_*``, ``EVERVAULT_*``) and no other: pydantic-settings would otherwise
also read a field's bare name, case-insensitively, so a generic ``ACL`` or
``API_KEYS`` that a container happens to carry would change access control.
Code that builds settings by field name uses :meth:`Settings.from_fields`.

A bad value stops start-up through :func:`describe_settings_error`, which
names the variable and never repeats its value.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from citadel.setting_values import Network as Network  # re-exported: citadel.config.Network
from citadel.setting_values import (
    check_api_keys_shape,
    check_caller_identities,
    check_http_url,
    check_limit,
    check_storage_uri,
    networks,
)

log = structlog.get_logger("citadel")

Operation = Literal["encrypt", "decrypt", "sign", "rewrap"]
ProviderName = Literal["local", "evervault"]

DEFAULT_ACL: dict[str, list[Operation]] = {
    "sentinel": ["encrypt"],
    "conductor": ["decrypt"],
    "api-gateway": [],
    "alchemist": [],
}


def _env(name: str) -> Any:
    """A field read from exactly one variable."""
    return Field(validation_alias=name)


class Settings(BaseSettings):
    """Citadel's configuration, from the environment and an optional ``.env``."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_by_name=False,
        validate_by_alias=True,
        case_sensitive=True,
        hide_input_in_errors=True,
    )

    env: Annotated[Literal["development", "production"], _env("CITADEL_ENV")] = "development"
    provider: Annotated[ProviderName, _env("CITADEL_PROVIDER")] = "local"
    decrypt_providers_raw: Annotated[str | None, _env("CITADEL_DECRYPT_PROVIDERS")] = None
    api_keys: Annotated[dict[str, list[str]] | None, _env("CITADEL_API_KEYS")] = None
    api_keys_file: Annotated[Path | None, _env("CITADEL_API_KEYS_FILE")] = None
    acl: Annotated[dict[str, list[Operation]], _env("CITADEL_ACL")] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_ACL.items()},
        validation_alias="CITADEL_ACL",
    )
    rate_limit_per_caller: Annotated[str, _env("CITADEL_RATE_LIMIT_PER_CALLER")] = "100/minute"
    rate_limits: Annotated[dict[str, str] | None, _env("CITADEL_RATE_LIMITS")] = None
    rate_limit_per_user: Annotated[str, _env("CITADEL_RATE_LIMIT_PER_USER")] = "10/minute"
    rate_limit_auth_failures: Annotated[str, _env("CITADEL_RATE_LIMIT_AUTH_FAILURES")] = "20/minute"
    rate_limit_storage_uri: Annotated[str, _env("CITADEL_RATE_LIMIT_STORAGE_URI")] = "memory://"
    breaker_fail_max: Annotated[int, Field(ge=1), _env("CITADEL_BREAKER_FAIL_MAX")] = 5
    breaker_reset_s: Annotated[float, Field(gt=0), _env("CITADEL_BREAKER_RESET_S")] = 1.0
    breaker_reset_max_s: Annotated[float, Field(gt=0), _env("CITADEL_BREAKER_RESET_MAX_S")] = 16.0
    max_plaintext_bytes: Annotated[
        int, Field(ge=1, le=1_048_576), _env("CITADEL_MAX_PLAINTEXT_BYTES")
    ] = 4096
    max_sign_message_bytes: Annotated[
        int, Field(ge=1, le=1_048_576), _env("CITADEL_MAX_SIGN_MESSAGE_BYTES")
    ] = 65536
    max_batch_items: Annotated[int, Field(ge=1, le=10_000), _env("CITADEL_MAX_BATCH_ITEMS")] = 100
    max_batch_bytes: Annotated[
        int, Field(ge=1024, le=268_435_456), _env("CITADEL_MAX_BATCH_BYTES")
    ] = 8_388_608
    trusted_proxies_raw: Annotated[str | None, _env("CITADEL_TRUSTED_PROXIES")] = None
    read_timeout_s: Annotated[float, Field(gt=0, le=600), _env("CITADEL_READ_TIMEOUT_S")] = 10.0
    tls_cert_file: Annotated[Path | None, _env("CITADEL_TLS_CERT_FILE")] = None
    tls_key_file: Annotated[Path | None, _env("CITADEL_TLS_KEY_FILE")] = None
    tls_client_ca_file: Annotated[Path | None, _env("CITADEL_TLS_CLIENT_CA_FILE")] = None
    tls_caller_identities: Annotated[
        dict[str, str] | None, _env("CITADEL_TLS_CALLER_IDENTITIES")
    ] = None
    local_keyring: Annotated[Path, _env("CITADEL_LOCAL_KEYRING")] = Path(".citadel/keyring.json")
    log_format: Annotated[Literal["json", "console"], _env("CITADEL_LOG_FORMAT")] = "json"
    log_level: Annotated[
        Literal["debug", "info", "warning", "error", "critical"], _env("CITADEL_LOG_LEVEL")
    ] = "info"
    audit_pseudonym_key: Annotated[SecretStr | None, _env("CITADEL_AUDIT_PSEUDONYM_KEY")] = None
    docs: Annotated[bool | None, _env("CITADEL_DOCS")] = None
    decrypt_concurrency: Annotated[
        int, Field(ge=1, le=1024), _env("CITADEL_DECRYPT_CONCURRENCY")
    ] = 64

    evervault_app_id: Annotated[str | None, _env("EVERVAULT_APP_ID")] = None
    evervault_api_key: Annotated[SecretStr | None, _env("EVERVAULT_API_KEY")] = None
    evervault_api_url: Annotated[str, _env("EVERVAULT_API_URL")] = "https://api.evervault.com/"
    evervault_curve: Annotated[Literal["SECP256K1", "SECP256R1"], _env("EVERVAULT_CURVE")] = (
        "SECP256K1"
    )
    evervault_timeout_s: Annotated[float, Field(gt=0, le=120), _env("EVERVAULT_TIMEOUT_S")] = 5.0

    @classmethod
    def from_fields(cls, *, env_file: str | None = None, **fields: Any) -> Settings:
        """Settings from Python field names (tests, scripts), still reading the environment."""
        by_alias = {_alias(name): value for name, value in fields.items()}
        return cls(_env_file=env_file, **by_alias)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("evervault_curve", mode="before")
    @classmethod
    def _upper_curve(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("evervault_api_url")
    @classmethod
    def _slash_url(cls, value: str) -> str:
        # The SDK concatenates base_url + path, so the slash is load-bearing.
        return check_http_url(value)

    @field_validator("rate_limit_per_caller", "rate_limit_per_user", "rate_limit_auth_failures")
    @classmethod
    def _valid_limit(cls, value: str) -> str:
        return check_limit(value)

    @field_validator("rate_limits")
    @classmethod
    def _valid_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            for caller, limit in value.items():
                if not caller:
                    raise ValueError("has an empty caller name")
                check_limit(limit)
        return value

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _valid_storage(cls, value: str) -> str:
        # Checked here, before any library sees it: a library's error would
        # quote the URI, password included.
        return check_storage_uri(value)

    @field_validator("api_keys")
    @classmethod
    def _valid_keys(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if value is not None:
            check_api_keys_shape(value)
        return value

    @field_validator("decrypt_providers_raw")
    @classmethod
    def _valid_providers(cls, value: str | None) -> str | None:
        if value is not None:
            names = [p.strip() for p in value.split(",") if p.strip()]
            if not names or any(p not in ("local", "evervault") for p in names):
                raise ValueError("must be a comma-separated list of local, evervault")
        return value

    @field_validator("trusted_proxies_raw")
    @classmethod
    def _valid_proxies(cls, value: str | None) -> str | None:
        if value is not None:
            networks(value)
        return value

    @field_validator("tls_cert_file", "tls_key_file", "tls_client_ca_file", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: Any) -> Any:
        # A compose file passes ${CITADEL_TLS_CERT_FILE:-}: empty means unset.
        return None if value == "" else value

    @field_validator("tls_caller_identities")
    @classmethod
    def _valid_identities(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_caller_identities(value) if value is not None else None

    @model_validator(mode="after")
    def _provider_needs(self) -> Settings:
        if "evervault" in self.decrypt_providers:
            if not self.evervault_app_id:
                raise ValueError("EVERVAULT_APP_ID is required with the evervault provider")
            if self.evervault_api_key is None:
                raise ValueError("EVERVAULT_API_KEY is required with the evervault provider")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("CITADEL_TLS_CERT_FILE and CITADEL_TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("CITADEL_TLS_CLIENT_CA_FILE needs CITADEL_TLS_CERT_FILE and _KEY_FILE")
        if self.tls_caller_identities is not None and self.tls_client_ca_file is None:
            raise ValueError("CITADEL_TLS_CALLER_IDENTITIES needs CITADEL_TLS_CLIENT_CA_FILE")
        return self

    @property
    def decrypt_providers(self) -> tuple[ProviderName, ...]:
        """``CITADEL_DECRYPT_PROVIDERS``, always including ``CITADEL_PROVIDER``, first."""
        names: list[ProviderName] = [self.provider]
        for raw in (self.decrypt_providers_raw or "").split(","):
            name = raw.strip()
            if name in ("local", "evervault") and name not in names:
                names.append(name)  # type: ignore[arg-type]
        return tuple(names)

    @property
    def trusted_proxies(self) -> tuple[Network, ...]:
        """``CITADEL_TRUSTED_PROXIES`` as networks, parsed once."""
        return networks(self.trusted_proxies_raw) if self.trusted_proxies_raw else ()

    @property
    def tls_enabled(self) -> bool:
        """Whether the listener serves HTTPS (a certificate and its key are set)."""
        return self.tls_cert_file is not None and self.tls_key_file is not None

    def rate_limit_for(self, caller: str) -> str:
        """The caller's own limit from ``CITADEL_RATE_LIMITS``, else the per-caller default."""
        return (self.rate_limits or {}).get(caller, self.rate_limit_per_caller)

    @property
    def docs_enabled(self) -> bool:
        """API docs default to on in development and off in production."""
        return self.docs if self.docs is not None else self.env == "development"

    @property
    def dev_dir(self) -> Path:
        """Where development-only generated files live: beside the keyring."""
        return self.local_keyring.parent

    def load_api_keys_file(self) -> dict[str, list[str]] | None:
        """Read ``CITADEL_API_KEYS_FILE``; raises :class:`SettingError` naming the variable."""
        if self.api_keys_file is None:
            return None
        try:
            raw = json.loads(
                read_secret_file(self.api_keys_file, "CITADEL_API_KEYS_FILE", self.env)
            )
        except OSError:
            raise SettingError("CITADEL_API_KEYS_FILE", "cannot be read") from None
        except ValueError:
            raise SettingError("CITADEL_API_KEYS_FILE", "is not valid JSON") from None
        try:
            check_api_keys_shape(raw)
        except ValueError as exc:
            raise SettingError("CITADEL_API_KEYS_FILE", str(exc)) from None
        return dict(raw)


class SettingError(Exception):
    """A setting that cannot be used; the message names it and never holds its value."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable} {problem}")


# -- secret files' modes ---------------------------------------------------------
#
# A file of keys (the keyring, the API keys file, the development key files)
# must not let another local user read or replace it. The rule, applied to the
# file a path resolves to (symlinks followed, as in a Kubernetes Secret mount):
#
# - no permission at all for others (mode & 0o007);
# - the group may read, nothing more (mode & 0o030): 0640 and 0440 are how a
#   Kubernetes Secret is shared with the pod's fsGroup, or a file with a group
#   made for Citadel; a group that may write could replace the keys;
# - the owner is Citadel's own user or root: any other owner could chmod and
#   rewrite it at will.
#
# Production refuses such a file; development logs ``secret_file_unsafe``
# (once per file and mode) and goes on.

EXPECTED_KEY_FILE_MODES = "0600 or 0400 (owner only), or 0640 or 0440 for a group that must read it"
_FIX = "chmod 600 (owner only; 640 when a group such as Kubernetes' fsGroup must read it)"
_warned: set[tuple[str, str, int, int, int]] = set()


def _verbs(bits: int) -> str:
    names = [n for bit, n in ((4, "read"), (2, "change"), (1, "execute")) if bits & bit]
    return " and ".join(names)


def secret_file_problem(mode: int, uid: int, euid: int | None = None) -> str | None:
    """What is unsafe in a key file of permission bits ``mode`` owned by ``uid``, or None.

    The text names the mode and the fix, never the file's content.
    """
    mode = stat.S_IMODE(mode)
    if mode & 0o007:
        return f"has mode {mode:04o}, which lets other users {_verbs(mode)} it; {_FIX}"
    if mode & 0o030:
        return f"has mode {mode:04o}, which lets its group {_verbs(mode >> 3)} it; {_FIX}"
    me = os.geteuid() if euid is None else euid
    if uid not in (me, 0):
        return (
            f"is owned by uid {uid}, neither Citadel's user (uid {me}) nor root, who could "
            f"replace it; chown it to uid {me} (or root) and {_FIX}"
        )
    return None


def read_secret_file(path: Path, variable: str, env: str) -> bytes:
    """The bytes of a key file, after checking the mode of the very file opened.

    In production an unsafe mode or owner (see :func:`secret_file_problem`)
    raises :class:`SettingError` naming ``variable``; in development it logs
    ``secret_file_unsafe``. ``OSError`` when the file cannot be read.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        problem = secret_file_problem(st.st_mode, st.st_uid)
        if problem is not None:
            if env == "production":
                raise SettingError(variable, problem)
            target = os.path.realpath(path)
            seen = (variable, target, st.st_ino, st.st_mode, st.st_uid)
            if seen not in _warned:
                _warned.add(seen)
                log.warning(
                    "secret_file_unsafe",
                    setting=variable,
                    path=target,
                    mode=f"{stat.S_IMODE(st.st_mode):04o}",
                    owner_uid=st.st_uid,
                    expected=EXPECTED_KEY_FILE_MODES,
                    problem=problem,
                    refused_in="production",
                )
        return f.read()


def describe_settings_error(exc: Exception) -> str:
    """One line naming the offending variable(s), never a value."""
    if isinstance(exc, SettingError):
        return f"invalid setting: {exc}"
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_input=False, include_url=False, include_context=False):
            msg = _safe_msg(err["type"], err["msg"])
            parts.append(f"{_alias(str(err['loc'][0]))} ({msg})" if err["loc"] else msg)
        return "invalid setting: " + "; ".join(parts)
    if isinstance(exc, SettingsError):
        # pydantic-settings words these "error parsing value for field "x" from source ...".
        text = str(exc)
        for name, info in Settings.model_fields.items():
            if f'"{name}"' in text or f'"{info.validation_alias}"' in text:
                return f"invalid setting: {_alias(name)} (not valid JSON)"
        return "invalid setting: a JSON setting could not be parsed"
    return f"invalid setting: {type(exc).__name__}"


def _safe_msg(kind: str, msg: str) -> str:
    # Messages of our own validators and pydantic's type errors hold no input;
    # anything else is reduced to its type so that no value can slip through.
    if kind in {"value_error", "assertion_error"}:
        return msg.removeprefix("Value error, ")
    if kind in {"literal_error", "int_parsing", "float_parsing", "bool_parsing", "missing"}:
        return msg
    if kind.startswith(("greater_than", "less_than", "dict_type", "list_type", "string_type")):
        return msg
    return kind


def _alias(field: str) -> str:
    """The variable a field is read from (``api_keys`` → ``CITADEL_API_KEYS``)."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    return alias if isinstance(alias, str) else field
