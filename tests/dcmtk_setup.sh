#!/bin/sh
# Make Debian's dcmtk (storescu, storescp, echoscu, dcm2pdf) available for the DICOM node tests
# (tests/workflow/test_dicom_node.py). Installs it through apt when it is missing and we are
# root; prints the path of storescp.
# Exit status 0: dcmtk available; 1: not available (the tests then skip, saying why).
set -u
if ! command -v storescp >/dev/null 2>&1 || ! command -v storescu >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "dcmtk missing: installing it with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                dcmtk >&2 || echo "apt-get install dcmtk failed" >&2
    else
        echo "dcmtk missing and not root (or no apt-get): cannot install it" >&2
    fi
fi
command -v storescu >/dev/null 2>&1 || exit 1
command -v storescp || exit 1
