//! netboot: bootstraps a cluster service network.
