#!/usr/bin/env python3
"""Write a held-out digit from scikit-learn's data set as an image, the way a user would
send one: enlarged, dark ink on white paper. Usage: draw_digit.py DIGIT OUT.png|OUT.jpg"""
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_data  # noqa: E402

if len(sys.argv) != 3:
    sys.exit(__doc__)
digit, out = int(sys.argv[1]), sys.argv[2]
(_, _), (x, y) = digits_data.split()
pixels = x[list(y).index(digit)].reshape(8, 8)
ink = (pixels * 255.0 / 16.0).round().astype(np.uint8)
Image.fromarray(255 - ink, "L").resize((64, 64), Image.BILINEAR).save(out)
print(f"wrote {out}: a {digit} from the held-out set")
