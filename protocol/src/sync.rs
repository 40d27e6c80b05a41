//! The one poison-tolerant lock helper, for host and guest code alike (this is the one crate
//! both link). A panic while a lock was held leaves plain data behind, never a broken
//! invariant of the lock itself; every msb mutex guards data that stays valid between
//! statements, so a poisoned lock is taken over rather than propagated.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking it over if a panicking holder poisoned it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
