#!/usr/bin/env bash
# System packages some tests use (best effort, idempotent): headless Chromium renders report.html in
# tests/test_report.py. Tests that need a missing package skip with a reason instead of failing.
set -euo pipefail

have_chromium() {
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}

if have_chromium; then
  echo "chromium: already installed ($(command -v chromium || command -v chromium-browser))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium: apt-get not available; report rendering tests will skip"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "chromium: not root and no sudo; report rendering tests will skip"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
have_chromium && echo "chromium: installed" || echo "chromium: install failed; report rendering tests will skip"
