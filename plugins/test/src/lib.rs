//! The example task of the process pool that `runner` grew from: print the
//! params on a line, return them unchanged.

use plugin_api::export_task;
use serde_json::Value;

fn run(params: Value) -> Result<Value, String> {
    println!("{params}");
    Ok(params)
}

export_task!(run);
