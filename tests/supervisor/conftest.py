"""Put the repository root on sys.path.

Without it `import supervisor` may find this very directory (tests/supervisor, a namespace
package) instead of the real package whenever the project is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
