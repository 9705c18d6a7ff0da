#!/bin/sh
# Make Debian's dcmtk (storescu, storescp, echoscu, dcm2pdf) available for the DICOM node tests
# (tests/workflow/test_dicom_node.py); prints the path of storescp.
# Exit status 0: available; 1: not (the tests then skip, saying why).
exec sh "$(dirname "$0")/apt_setup.sh" dcmtk storescu echoscu storescp
