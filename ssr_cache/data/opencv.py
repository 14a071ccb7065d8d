"""OpenCV for the package, with its own thread pool off.

A pool that has run once in a process does not survive `fork`: a DataLoader worker forked after the parent
used a parallel cv2 call (a full-frame LUT or resize) hangs at its first cv2 call (seen: the cache build
stalled for good). Our parallelism is one process per decoding worker anyway, so every cv2 call runs in the
calling thread. Import cv2 from here, never directly.
"""

import cv2

cv2.setNumThreads(1)

__all__ = ["cv2"]
