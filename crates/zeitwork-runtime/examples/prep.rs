fn main() {
    let k = zeitwork_runtime::guest::find_kernel(None).unwrap();
    let a = zeitwork_runtime::guest::prepare(std::path::Path::new("/tmp/guest"), &k, None).unwrap();
    println!("{a:?}");
}
