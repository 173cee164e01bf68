"""What the client scripts share: comparing two directory trees byte for byte."""

import filecmp
import os


def same_trees(a, b):
    """Whether trees `a` and `b` hold the same names with the same bytes."""
    c = filecmp.dircmp(a, b)
    if c.left_only or c.right_only or c.diff_files or c.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, c.common_files, shallow=False)
    return not mismatch and not errors and all(same_trees(os.path.join(a, d), os.path.join(b, d))
                                               for d in c.common_dirs)
