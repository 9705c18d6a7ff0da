"""Ground truth for validation: phantoms, hybrid real-anatomy cases, scoring, the
repeatability study."""
