"""Reading the input: a DICOM export folder or a NIfTI sessions sheet, into NIfTI volumes.

The DICOM path, in the order the data flows:

- :mod:`~pipeline.io.dicom_index` -- the ``limbtrack index`` step (``main``): index a folder,
  choose the patient and the series per study, write index.tsv, problems.tsv, sessions.json
  and sessions.tsv.
- :mod:`~pipeline.io.scan` -- ``index_folder``: walk the folder, read every header once (in
  worker processes for large folders), group files by study and series, check that a series'
  files are one acquisition (``series_agreement``) and make volumes.
- :mod:`~pipeline.io.headers` -- read one file's header quickly and safely (no pixel data) and
  keep what the index needs of it (``file_header``).
- :mod:`~pipeline.io.dicom_frames` -- the 2-D frames of a file (classic, enhanced multi-frame,
  mosaic), their grouping into volumes (``split_volumes``), stack checks and pixel data.
- :mod:`~pipeline.io.classify` -- sequence class of a series (T1w, STIR, T2FS, Dixon, ...) and
  slice orientation.
- :mod:`~pipeline.io.identity` -- patient identity: normalising, the pseudonymous fingerprint,
  grouping studies into patients.
- :mod:`~pipeline.io.records` -- what the index finds: ``FileHeader``, ``SeriesRecord``,
  ``VolumeRecord``, ``Problem``, ``IndexResult``.
- :mod:`~pipeline.io.selection` -- what is used: the patient, one anatomical and one
  fluid-sensitive series per study (``select_sessions``), series status, the index outputs.
- :mod:`~pipeline.io.convert` -- the ``limbtrack convert`` step: the chosen series (or every
  volume of a folder) to NIfTI with JSON sidecars.
- :mod:`~pipeline.io.dicom_values` -- readers of DICOM values: dates, times, integers,
  multi-valued numbers.

The NIfTI path: :mod:`~pipeline.io.nifti_input` -- a sessions sheet of NIfTI files, indexed
and converted in the shapes the DICOM path writes (``limbtrack nifti``).

Shared: :mod:`~pipeline.io.files` -- atomic writes, TSV/JSON, checksums, the folder walk, and
``finite_float``, the one reader of a number.
"""
