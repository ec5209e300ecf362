//! Bounded multi-producer multi-consumer ring. (in progress)
