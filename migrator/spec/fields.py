"""What the spec's sections share: identifiers, environment references, the strict base model."""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REGION = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
COUNTRY = re.compile(r"^[A-Z]{2}$")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def mask_dsn(dsn: str) -> str:
    """A DSN with its password replaced, for logs and reprs."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)(\S+)", r"\1***", dsn, flags=re.I)


def expand_env(v: Any) -> Any:
    """'${NAME}' references replaced by the environment's values; an unset one is an error."""
    if isinstance(v, str):
        missing = [m for m in ENV_REF.findall(v) if m not in os.environ]
        if missing:
            raise ValueError(f"environment variable {missing[0]} is not set")
        return ENV_REF.sub(lambda m: os.environ[m.group(1)], v)
    return v


def ident(v: str, what: str) -> str:
    if not IDENT.match(v):
        raise ValueError(f"{what} {v!r} is not a plain SQL identifier")
    return v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
