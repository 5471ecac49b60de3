//! `/v1/images`: list, inspect, pull (with progress), import, remove.

use burrow_types::images::{Image, PullEvent, PullImage, PullProgress, RemovedImage};
use futures_util::StreamExt;
use reqwest::Method;

use crate::{Client, ClientError};

impl Client {
    pub async fn images(&self) -> Result<Vec<Image>, ClientError> {
        self.json(self.request(Method::GET, "/v1/images")).await
    }

    /// An image by reference, id or id prefix.
    pub async fn image(&self, name: &str) -> Result<Image, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/images/{name}")))
            .await
    }

    pub async fn remove_image(&self, name: &str) -> Result<RemovedImage, ClientError> {
        self.json(self.request(Method::DELETE, &format!("/v1/images/{name}")))
            .await
    }

    /// Pulls an image, calling `progress` with each report the server streams.
    pub async fn pull_image(
        &self,
        req: &PullImage,
        mut progress: impl FnMut(&PullProgress),
    ) -> Result<Image, ClientError> {
        let req = PullImage {
            progress: true,
            ..req.clone()
        };
        let resp = Self::check(
            self.request(Method::POST, "/v1/images")
                .json(&req)
                .send()
                .await?,
        )
        .await?;
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk?);
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                match serde_json::from_slice::<PullEvent>(&line)? {
                    PullEvent::Progress(p) => progress(&p),
                    PullEvent::Image(img) => return Ok(img),
                    PullEvent::Error(e) => {
                        return Err(ClientError::Api {
                            status: 200,
                            code: e.code,
                            message: e.message,
                        })
                    }
                }
            }
        }
        Err(ClientError::Api {
            status: 200,
            code: "pull_interrupted".into(),
            message: "the server ended the pull's stream without a result".into(),
        })
    }

    /// Imports a `docker save` tarball or a tar of an OCI layout.
    pub async fn import_image(
        &self,
        body: impl Into<reqwest::Body>,
        tag: Option<&str>,
    ) -> Result<Vec<Image>, ClientError> {
        let mut rb = self
            .request(Method::POST, "/v1/images/import")
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(body);
        if let Some(t) = tag {
            rb = rb.query(&[("tag", t)]);
        }
        self.json(rb).await
    }
}
