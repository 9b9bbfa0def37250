//! `examples/base-images.sh`: makes the base images the examples and the tests name on the
//! daemon `DOCKER_HOST` names (the local one by default), as the tests make them.
fn main() -> std::process::ExitCode {
    match testkit::images::base_images_on(None) {
        Ok(()) => {
            println!("base images ready: {}", testkit::images::TAGS.join(" "));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("base-images: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
