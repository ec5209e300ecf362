//! Bounded single-producer single-consumer ring. (in progress)
