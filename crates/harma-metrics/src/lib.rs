//! Retrieval metrics (R@1/5/10 both ways, mR): to be built (see the issues).
