"""`ssr cache build`: build config, view planning, dry-run size estimate, the encoder pipeline."""
