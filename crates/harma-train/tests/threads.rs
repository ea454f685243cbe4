//! Candle's element-wise pool is off after `candle_ops_on_caller` (its own process: the pool
//! is built once, at the first op, from the environment of that moment).

#[test]
fn candle_ops_run_on_the_caller() {
    let before = std::env::var("CANDLE_NUM_THREADS").ok();
    harma_train::candle_ops_on_caller();
    let pool = candle_core::utils::barrier_pool();
    match before {
        // our default: no pool threads, every op runs on the thread that calls it
        None => {
            assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("1"));
            assert_eq!(pool.n_workers(), 0);
        }
        // a user's setting stands
        Some(v) => {
            assert_eq!(std::env::var("CANDLE_NUM_THREADS").ok(), Some(v.clone()));
            let n: usize = v.parse().unwrap_or(0);
            if n > 0 {
                assert_eq!(pool.n_workers(), n - 1);
            }
        }
    }
    // and ops still compute: a sum over a tensor big enough to be split if the pool ran
    let x = candle_core::Tensor::ones(100_000, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let y = (&x + &x)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(y, 200_000.0);
}
