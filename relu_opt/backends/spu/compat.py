"""Whether SecretFlow SPU can be imported here, and the one-line fix when it cannot."""

from __future__ import annotations

import sys
from functools import cache

from relu_opt.errors import ConfigError


@cache
def require_spu() -> None:
    """Raise ConfigError naming the fix when SPU 0.9.5 (and its jax) cannot be imported on this Python."""
    py = ".".join(str(v) for v in sys.version_info[:2])
    try:
        import spu  # noqa: F401
    except ImportError as exc:
        if sys.version_info[:2] not in ((3, 10), (3, 11)):
            raise ConfigError(
                f"--backend spu needs SecretFlow SPU 0.9.5, which has wheels for Python 3.10-3.11 only (this is {py}); "
                "install relu-opt in a Python 3.11 venv with `bash install.sh` (PYTHON=python3.11), or use --backend "
                "crypten"
            ) from None
        raise ConfigError(
            f"--backend spu needs SecretFlow SPU 0.9.5 ({exc}); install it with `bash install.sh` (it installs the "
            "[spu] extra and spu itself), or use --backend crypten"
        ) from None
