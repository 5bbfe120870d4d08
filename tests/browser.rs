//! A wasm build's integer kernels in headless Chromium (wasm-bindgen-test with chromedriver),
//! each against the scalar one: for the relaxed-SIMD build, whose kernel Node 20 cannot check
//! (V8 11.3 has relaxed SIMD behind a flag and computes `i32x4.relaxed_dot_i8x16_i7x16_add_s`
//! twice over: 8ab for a lane of four products ab, measured). `./build.sh test` runs it for the
//! relaxed build; the whole engine in that build is tested by the end-to-end test (tests/node),
//! which compares its greedy text on the `report` file with the other builds'.
#![cfg(target_arch = "wasm32")]

use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
fn int8_kernels_equal_the_scalar_one_in_the_browser() {
    let checked = wasmlm::qmatmul::kernel::check_kernels().unwrap();
    let want: &[&str] = if cfg!(all(target_feature = "simd128", feature = "relaxed-simd")) {
        &["scalar", "simd128", "relaxed-simd"]
    } else if cfg!(target_feature = "simd128") {
        &["scalar", "simd128"]
    } else {
        &["scalar"]
    };
    assert_eq!(checked, want);
}
