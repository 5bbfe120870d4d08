//! A wasm build's integer kernels in headless Chromium (wasm-bindgen-test with chromedriver),
//! each against the scalar one: for the relaxed-SIMD build, whose kernel Node 20 cannot check
//! (V8 11.3 has relaxed SIMD behind a flag and computes `i32x4.relaxed_dot_i8x16_i7x16_add_s`
//! twice over: 8ab for a lane of four products ab, measured). `./build.sh test` runs it for the
//! relaxed build; the whole engine in that build is tested by the end-to-end test (tests/node),
//! which compares its greedy text on the `ort-dynamic-qint8` file with the other builds'.
#![cfg(target_arch = "wasm32")]

use wasm_bindgen_test::*;

#[path = "common/wasm_kernels.rs"]
mod wasm_kernels;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
fn int8_kernels_equal_the_scalar_one_in_the_browser() {
    assert_eq!(wasmlm::qmatmul::kernel::check_kernels().unwrap(), wasm_kernels::expected());
    assert_eq!(wasmlm::qmatmul::blockq8::check_block_kernels().unwrap(), wasm_kernels::expected_block());
}
