"""The DICOM node (``limbtrack listen``): a storage SCP that files MR images per patient, runs
the workflow for a patient once their sending has been quiet for a while, and sends the results
(DICOM SEG, TID 1500 SR, the report as Encapsulated PDF) to a configured DICOM destination.

Modules, in the order an image travels:

* :mod:`pipeline.node.spool` - the spool folder: patient key, filing, studies, the patients
  sheet (day 0 and side, which DICOM does not carry), the workflow's input view;
* :mod:`pipeline.node.scp` - the storage SCP (C-ECHO, C-STORE of MR images; other SOP
  classes refused with status 0x0122);
* :mod:`pipeline.node.status` - ``<spool>/<patient key>/status.json``;
* :mod:`pipeline.node.jobs` - the quiet timer and one run per patient at a time;
* :mod:`pipeline.node.runner` - one workflow run (Snakemake subprocess) and its results;
* :mod:`pipeline.node.send` - C-STORE of the results to the destination;
* :mod:`pipeline.node.listen` - the command line (``main(argv)``).

docs/dicom-node.md says how a PACS is configured to use it.
"""
