//! Shared write access to one output buffer for parallel tasks that each write their own part.

use std::marker::PhantomData;

/// A buffer that rayon tasks write into at once, each its own disjoint part (a block of an
/// output matrix, one attention head's columns).
///
/// The rule that makes this sound is enforced where it can be: it is made only from an
/// exclusive borrow of the whole buffer, so no other reference to it exists while tasks
/// write, it cannot outlive the buffer, and every pointer it hands out is bounds-checked
/// against the buffer's length. What the type cannot check, that no two tasks write the same
/// element, each call site states in its SAFETY comment.
pub struct DisjointWrites<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: the buffer is exclusively borrowed for 'a; tasks write disjoint elements (each call
// site's contract), so sharing the pointer across threads races on nothing. `T: Send` because
// values are written from other threads.
unsafe impl<T: Send> Send for DisjointWrites<'_, T> {}
// SAFETY: as above; `&DisjointWrites` only hands out raw pointers.
unsafe impl<T: Send> Sync for DisjointWrites<'_, T> {}

impl<'a, T> DisjointWrites<'a, T> {
    /// Exclusive write access to `buf` for the tasks that split it.
    pub fn new(buf: &'a mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _borrow: PhantomData,
        }
    }

    /// A pointer to element `offset`, from which a view reaching `extent` elements (its last
    /// element at `offset + extent - 1`) lies inside the buffer. Panics otherwise.
    pub fn at(&self, offset: usize, extent: usize) -> *mut T {
        assert!(
            offset
                .checked_add(extent)
                .is_some_and(|end| end <= self.len),
            "disjoint write of {extent} elements at {offset} outside a buffer of {}",
            self.len
        );
        // SAFETY: offset <= len (checked above), so the result is inside or one past the end
        // of the borrowed allocation.
        unsafe { self.ptr.add(offset) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_bounds_checked() {
        let mut v = vec![0f32; 10];
        let w = DisjointWrites::new(&mut v);
        assert_eq!(w.at(3, 7) as usize - w.at(0, 1) as usize, 12);
        let at = |o, e| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.at(o, e)));
        assert!(at(4, 7).is_err() && at(usize::MAX, 2).is_err() && at(10, 0).is_ok());
    }
}
