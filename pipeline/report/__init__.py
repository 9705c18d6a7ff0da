"""The HTML report and the cohort table: slicing, figures, overlays, context, templates."""
