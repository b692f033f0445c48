"""The images' HEALTHCHECK: exit 0 when ``/health`` on ``$GGUFSERVE_PORT`` answers 200."""

import os
import sys
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('GGUFSERVE_PORT', '8080')}/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return 0 if reply.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
