"""Finding Java and the jars of the installed pycocoevalcap wheel (METEOR 1.5, Stanford CoreNLP).

The official E2E scorer runs both jars; when a Java runtime is here we run the very same files
(pycocoevalcap ships them byte for byte as tuetschek/e2e-metrics does), with no download.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from splitlora_ds.errors import ConfigError

IMPLS = ("auto", "jar", "python")
JAVA_TIMEOUT_S = 600  # a whole E2E test set takes seconds; this only stops a hung JVM


@lru_cache(maxsize=1)
def java_available() -> bool:
    """Whether `java` is on PATH and starts (a broken install or a stub fails `-version`)."""
    java = shutil.which("java")
    if not java:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def java_command(*args: str) -> list[str]:
    return [shutil.which("java") or "java", *args]


def pycocoevalcap_file(relative: str) -> Path:
    """A file inside the installed pycocoevalcap package, e.g. 'meteor/meteor-1.5.jar'."""
    spec = importlib.util.find_spec("pycocoevalcap")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / relative
        if path.is_file():
            return path
    raise RuntimeError(f"pycocoevalcap/{relative} not found; reinstall with `pip install pycocoevalcap`")


def resolve_impl(impl: str, field: str = "impl") -> str:
    """'jar' or 'python' for a requested implementation: 'auto' takes the jars when Java runs."""
    if impl not in IMPLS:
        raise ConfigError(f"{field}: {impl!r} is invalid; expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "jar" if java_available() else "python"
    if impl == "jar" and not java_available():
        raise ConfigError(f"{field}: 'jar' needs a Java runtime (`java` on PATH), none was found; "
                          "use 'python' or 'auto'")
    return impl


__all__ = ["IMPLS", "java_available", "java_command", "pycocoevalcap_file", "resolve_impl"]
