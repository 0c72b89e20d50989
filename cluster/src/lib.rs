//! Cluster membership and pool ownership (openraft + sled). Empty until the cluster issue lands.
