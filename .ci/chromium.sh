#!/usr/bin/env bash
# Install Debian's chromium for the browser tests (tests/test_e2e_browser.py) where it is missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq chromium >&2
