"""limbtrack: longitudinal limb volumetry on serial MRI."""

__version__ = "0.1.0"
