#!/usr/bin/env bash
# Install Debian's Chromium for the real-browser widget test (tests/test_browser.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Never downloads a browser
# build of its own (no `playwright install`): playwright drives this system chromium.
# The Python side (jupyterlab, playwright) comes from settings.ini's dev_requirements.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "install_browser: /usr/bin/chromium present ($(/usr/bin/chromium --version 2>/dev/null || echo 'version unknown'))"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
