"""Dataset side: label spaces, readers of each dataset's real layout, synthetic scenes, class statistics."""
