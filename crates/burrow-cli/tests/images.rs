//! `burrow image` and `/v1/images` end to end: a real `burrow up` in a world of network namespaces
//! made for the test, a real `docker-registry` inside the server's namespace (so the server reaches
//! it on its own loopback and no packet leaves), images built with `umoci` and pushed with
//! `skopeo`, then pulled, imported, listed, inspected and removed through the CLI and the API.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use burrow_types::images::{Image, PullImage};
use common::*;

const REGISTRY: &str = "127.0.0.1:5000";

fn tools_present() -> bool {
    if !require_root("images end to end") {
        return false;
    }
    for tool in [
        "/usr/bin/docker-registry",
        "/usr/bin/skopeo",
        "/usr/bin/umoci",
    ] {
        if !Path::new(tool).exists() {
            eprintln!("skipping: images end to end needs {tool} (scripts/deps installs it)");
            return false;
        }
    }
    true
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("/usr/bin/nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).args(args);
    c
}

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert_ok(&out);
    stdout(&out)
}

/// `docker-registry` on 127.0.0.1:5000 of the namespace `ns`; killed when dropped.
struct Registry(Child);

impl Registry {
    fn start(ns: &str, dir: &Path) -> Registry {
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {REGISTRY}\n",
                dir.join("registry").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let mut cmd = in_ns(ns, &["docker-registry", "serve"]);
        cmd.arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = spawn_tied(cmd).unwrap();
        let up = (0..200).any(|_| {
            let ok = in_ns(ns, &["curl", "-sf", "-o", "/dev/null"])
                .arg(format!("http://{REGISTRY}/v2/"))
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            ok
        });
        assert!(up, "the registry did not start");
        Registry(child)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn images_are_pulled_imported_listed_and_removed_through_the_cli_and_the_api() {
    if !tools_present() {
        return;
    }
    let srv = TestServer::start_in_world(&[]).await;
    let ns = srv.world().server_ns.clone();
    let work = tempfile::tempdir().unwrap();
    let _registry = Registry::start(&ns, work.path());

    // An image made with umoci from a directory, pushed to the registry.
    let src = work.path().join("rootfs");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/greeting"), "hello from the image\n").unwrap();
    let layout = work.path().join("layout");
    let l = layout.to_str().unwrap();
    let tagged = format!("{l}:1");
    ok(Command::new("umoci").args(["init", "--layout", l]));
    ok(Command::new("umoci").args(["new", "--image", &tagged]));
    ok(Command::new("umoci")
        .args(["insert", "--image", &tagged])
        .arg(&src)
        .arg("/"));
    ok(Command::new("umoci").args([
        "config",
        "--image",
        &tagged,
        "--config.env=GREETING=hi",
        "--config.workingdir=/etc",
    ]));
    ok(&mut in_ns(
        &ns,
        &[
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{tagged}"),
            &format!("docker://{REGISTRY}/test/app:1"),
        ],
    ));

    // Pull through the CLI.
    let name = format!("{REGISTRY}/test/app:1");
    let out = srv.cli(&["image", "pull", &name]);
    assert_ok(&out);
    assert!(stdout(&out).contains(&name), "{}", stdout(&out));
    let listed: Vec<Image> =
        serde_json::from_str(&stdout(&srv.cli(&["--json", "image", "ls"]))).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].refs, std::slice::from_ref(&name));
    let shown: Image =
        serde_json::from_str(&stdout(&srv.cli(&["image", "inspect", &name]))).unwrap();
    assert!(shown.config.env.contains(&"GREETING=hi".to_string()));
    assert_eq!(shown.config.working_dir.as_deref(), Some("/etc"));
    assert_eq!(shown.platform, "linux/amd64");

    // Pull through the API with progress: the layers are already here, so it is all done at once,
    // and the last report says so.
    let mut reports = vec![];
    let again = srv
        .client()
        .pull_image(
            &PullImage {
                reference: name.clone(),
                ..Default::default()
            },
            |p| reports.push(p.clone()),
        )
        .await
        .unwrap();
    assert_eq!(again.id, shown.id);
    let last = reports.last().expect("progress reports");
    assert_eq!(
        (last.layers_done, last.bytes_done),
        (last.layers_total, last.bytes_total)
    );

    // A docker save tarball of the same image, under another name: imported, sharing its layers.
    let archive = work.path().join("saved.tar");
    ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{tagged}"),
        &format!("docker-archive:{}:example.test/saved:1", archive.display()),
    ]));
    let out = srv.cli(&["image", "import", archive.to_str().unwrap()]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("example.test/saved:1"),
        "{}",
        stdout(&out)
    );
    // And the OCI layout directory itself, with a tag.
    let out = srv.cli(&["image", "import", l, "--tag", "example.test/dir:1"]);
    assert_ok(&out);
    let listed = srv.client().images().await.unwrap();
    let ids: std::collections::BTreeSet<_> = listed.iter().map(|i| i.id.clone()).collect();
    assert_eq!(
        ids.len(),
        1,
        "the same image three ways is one image: {listed:?}"
    );
    let layers = std::fs::read_dir(srv.dir().join("data/images/layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(layers, shown.layers.len(), "layers are stored once");

    // Bad input is a structured error.
    let out = srv.cli(&["image", "pull", "Not A Reference"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad_reference"));
    let out = srv.cli(&["image", "pull", &format!("{REGISTRY}/test/missing:1")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("image_not_found"));
    let err = srv.client().image("example.test/none:1").await.unwrap_err();
    assert_eq!(err.code(), Some("image_not_found"));

    // The node's images are shared by every user of it: only an admin adds or removes them (a
    // user's pull with their own registry credentials would otherwise hand the image to every
    // other user, and any user could remove what another relies on). Users list and inspect.
    let admin = srv.client();
    let user_key = admin.create_user("images-user", None).await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let user = burrow_client::Client::new(&srv.url, &user_key);
    assert_eq!(user.images().await.unwrap().len(), 1);
    assert_eq!(user.image(&name).await.unwrap().id, shown.id);
    let refused = user
        .pull_image(
            &PullImage {
                reference: name.clone(),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("forbidden"), "{refused}");
    let refused = user
        .import_image(std::fs::read(&archive).unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("forbidden"), "{refused}");
    let refused = user.remove_image(&name).await.unwrap_err();
    assert_eq!(refused.code(), Some("forbidden"), "{refused}");
    assert_eq!(admin.images().await.unwrap().len(), 1, "nothing changed");

    // Removing names, then the image: its layers go with it.
    for n in [name.as_str(), "example.test/saved:1"] {
        let out = srv.cli(&["image", "rm", n]);
        assert_ok(&out);
        assert!(
            stdout(&out).contains(&format!("untagged {n}")),
            "{}",
            stdout(&out)
        );
    }
    let out = srv.cli(&["image", "rm", "example.test/dir:1"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("deleted"), "{}", stdout(&out));
    assert!(srv.client().images().await.unwrap().is_empty());
    let layers = std::fs::read_dir(srv.dir().join("data/images/layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(layers, 0);
}
