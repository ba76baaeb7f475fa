//! Resource pools as actors: subnets, host ports and user-id mappings.
