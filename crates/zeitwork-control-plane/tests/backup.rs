//! Backup of a running single-machine operator and restore into a fresh data
//! directory: the same projects, env values (decrypted with the same key) and
//! deployments; bad backups, wrong keys and existing state are refused with
//! nothing changed.

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::backup::{backup, restore, BackupError};
use zeitwork_control_plane::{Operator, OperatorConfig};

async fn start(dir: &std::path::Path) -> (Operator, Client) {
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = Client::new(&format!("http://{}", op.addr()), op.admin_token.clone());
    (op, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_running_operator_restores_into_a_fresh_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let (op, admin) = start(&src).await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    admin
        .put::<_, Value>("/api/v1/projects/acme/web/env/DATABASE_URL", &json!({"value": "postgres://s3cret"}))
        .await
        .unwrap();
    // Deployments keep being created while the backup is taken: it is consistent either way.
    let writer = {
        let admin = admin.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                let body = json!({"org": "acme", "project": "web", "image": format!("acme/web:{i}")});
                admin.post::<_, Value>("/api/v1/deployments", &body).await.unwrap();
            }
        })
    };
    let file = tmp.path().join("platform.backup");
    let info = backup(&src, &file).await.unwrap();
    writer.await.unwrap();
    assert_eq!(info.projects, 1);
    assert!(info.deployments <= 20);
    assert!(!String::from_utf8_lossy(&std::fs::read(&file).unwrap()).contains("s3cret"), "env values stay encrypted");
    assert!(matches!(backup(&src, &file).await, Err(BackupError::Store(_))), "an existing file is not overwritten");
    let before: Vec<Value> = admin.get("/api/v1/deployments?limit=1000").await.unwrap();
    op.shutdown().await;

    // Without the key, or with another one: refused, nothing written.
    assert!(matches!(restore(&file, &dst, None, false).await, Err(BackupError::WrongKey(_))));
    let other = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    assert!(matches!(restore(&file, &dst, Some(other), false).await, Err(BackupError::WrongKey(_))));
    assert!(!dst.join("zeitwork.db").exists());
    // A truncated file: refused.
    let bytes = std::fs::read(&file).unwrap();
    let cut = tmp.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("secret.key"), dst.join("secret.key")).unwrap();
    assert!(restore(&cut, &dst, None, false).await.is_err(), "a truncated backup is refused");
    assert!(!dst.join("zeitwork.db").exists());

    // With the key: the platform comes back serving the same state.
    let restored = restore(&file, &dst, None, false).await.unwrap();
    assert_eq!(restored.projects, 1);
    assert!(matches!(restore(&file, &dst, None, false).await, Err(BackupError::NotEmpty(_))), "existing state is kept");
    let (op2, _) = start(&dst).await;
    let admin2 = Client::new(
        &format!("http://{}", op2.addr()),
        Some(std::fs::read_to_string(src.join("admin.token")).unwrap().trim().to_owned()),
    );
    let env: Vec<Value> = admin2.get("/api/v1/projects/acme/web/env").await.unwrap();
    assert_eq!(env[0]["value"], "postgres://s3cret", "decrypted with the same key, by the same admin token");
    let after: Vec<Value> = admin2.get("/api/v1/deployments?limit=1000").await.unwrap();
    assert_eq!(after.len() as i64, restored.deployments);
    assert!(after.len() <= before.len());
    op2.shutdown().await;

    // A backup from a newer Zeitwork is refused.
    let newer = tmp.path().join("newer.backup");
    std::fs::copy(&file, &newer).unwrap();
    let conn = format!("sqlite://{}", newer.display());
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&conn).await.unwrap();
    sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (9999, 'future', 0)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::copy(src.join("secret.key"), fresh.join("secret.key")).unwrap();
    assert!(matches!(restore(&newer, &fresh, None, false).await, Err(BackupError::TooNew { .. })));
}
