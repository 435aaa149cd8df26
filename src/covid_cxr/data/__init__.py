"""From raw public datasets to a manifest with a patient-level split."""
