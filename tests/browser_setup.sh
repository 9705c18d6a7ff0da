#!/bin/sh
# Make Debian's chromium available for tests/test_browser.py.
# Installs it through apt when it is missing and we are root; prints the browser's path.
# Exit status 0: chromium available; 1: not available (the browser tests then skip).
set -u
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "chromium missing: installing it with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                chromium >&2 || echo "apt-get install chromium failed" >&2
    else
        echo "chromium missing and not root (or no apt-get): cannot install it" >&2
    fi
fi
command -v chromium || exit 1
