//! HarMA objective (contrastive with soft targets, adaptive triplet): to be built (see the issues).
