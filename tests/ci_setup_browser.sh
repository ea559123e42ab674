#!/bin/sh
# Install headless Chromium for tests/test_gallery_browser.py and the gallery benchmark
# (Debian/Ubuntu; run as root). Idempotent: does nothing when a browser is already there.
set -eu
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium || command -v chromium-browser)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q chromium
chromium --version
