//! What several test binaries of the operator share.

use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};

/// An operator on SQLite in `dir` on a free loopback port, its base URL and an admin client.
pub async fn operator(dir: &std::path::Path, node_timeout_secs: u64) -> (Operator, String, Client) {
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        node_timeout_secs,
        ..Default::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    (op, base, admin)
}
