//! Matrix products through the `gemm` crate (the GEMM Candle runs on the CPU): small
//! single-threaded products for the attention kernels, which run many of them in parallel, and
//! a multi-threaded accumulating product for linear layers.

/// A strided view: (pointer, row stride, column stride), in floats.
pub type View = (*const f32, isize, isize);

/// `dst = scale * a @ b` for small matrices, single-threaded (the callers run in parallel):
/// `dims` = [m, n, k]; `dst` = (pointer, row stride) of an [m, n] row-major output; `a` [m, k]
/// and `b` [k, n] are strided views.
///
/// # Safety
/// Every view must lie inside its buffer for the given dims and strides, and no other thread
/// may access `dst`'s elements meanwhile.
pub unsafe fn small_gemm(dims: [usize; 3], dst: (*mut f32, isize), a: View, b: View, scale: f32) {
    let [m, n, k] = dims;
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1,
            false,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `y [m, n] += a [m, k] b`, `b` given as (data, row stride, column stride); multi-threaded
/// over the rayon pool as Candle's own matmul is.
pub fn gemm_acc(y: &mut [f32], a: &[f32], m: usize, k: usize, n: usize, b: (&[f32], isize, isize)) {
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let (b, b_rs, b_cs) = b;
    assert!(y.len() == m * n && a.len() == m * k && b.len() == k * n);
    assert!(b_rs >= 0 && b_cs >= 0, "gemm: negative strides");
    let (rs, cs) = (b_rs as usize, b_cs as usize);
    // the last element `b` addresses is (k - 1, n - 1)
    assert!(
        k == 0 || n == 0 || (k - 1) * rs + (n - 1) * cs < b.len(),
        "gemm: strides ({b_rs}, {b_cs}) leave b's {} elements",
        b.len()
    );
    // SAFETY: the three buffers have the sizes asserted above and the (non-negative) strides
    // address only elements inside `b`; `y` is borrowed exclusively.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `x w_t + b` for `x` [rows, in], `w_t` [in, out] row-major and an optional `b` [out]: the
/// bias is written first and the GEMM accumulates into it (no separate pass or buffer).
pub fn linear_f32(
    x: &[f32],
    w_t: &[f32],
    b: Option<&[f32]>,
    (rows, inp, out): (usize, usize, usize),
) -> Vec<f32> {
    let mut y = match b {
        Some(b) => b.repeat(rows),
        None => vec![0.0; rows * out],
    };
    gemm_acc(&mut y, x, rows, inp, out, (w_t, out as isize, 1));
    y
}
