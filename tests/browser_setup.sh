#!/bin/sh
# Make Debian's chromium available for tests/workflow/test_browser.py and the report PDF;
# prints the browser's path. Exit status 0: available; 1: not (those tests then skip).
exec sh "$(dirname "$0")/apt_setup.sh" chromium chromium
