"""collector: a consent-gated statistics pixel (see README.md)."""
