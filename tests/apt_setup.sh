#!/bin/sh
# Make a Debian package's commands available for the tests that drive a real program:
#   sh tests/apt_setup.sh PACKAGE COMMAND [COMMAND ...]
# Installs PACKAGE through apt when a COMMAND is missing and we are root; prints the path of
# the last COMMAND. Exit status 0: every COMMAND available; 1: not (the tests then skip,
# saying why).
set -u
package=$1
shift
missing=0
for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
if [ "$missing" = 1 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "$package missing: installing it with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "$package" >&2 || echo "apt-get install $package failed" >&2
    else
        echo "$package missing and not root (or no apt-get): cannot install it" >&2
    fi
fi
last=""
for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || exit 1; last=$cmd; done
command -v "$last"
