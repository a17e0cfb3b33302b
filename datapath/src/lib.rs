//! netboot-datapath agent.
