#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_storyteller_browser.py), once.
# Idempotent and quiet: does nothing when /usr/bin/chromium exists. Needs root (apt-get).
# Playwright for Python drives it through executable_path; `playwright install` is never run.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-browser: chromium is missing and installing it needs root (apt-get install chromium)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# output only on failure
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; } >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
command -v chromium >/dev/null 2>&1
