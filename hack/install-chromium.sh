#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (tests/test_report_html.py), unless one is on PATH.
# Needs root (or sudo); apt's package lists are refreshed only when the first try fails.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
as_root=()
if [ "$(id -u)" != 0 ]; then
  as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null \
  || { "${as_root[@]}" apt-get update -q >/dev/null && "${as_root[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null; }
chromium --version
